//! `graceful`: one binary, three roles and a lab. All the work is in the library; see `startup`.
fn main() -> std::process::ExitCode {
    graceful::startup::main()
}
