//! Processes by /proc: a test's view of what a lab started and whether any of it outlived it.

use std::collections::BTreeSet;

/// A process as (pid, start time): a pid alone could be reused.
pub type ProcId = (i32, u64);

fn stat(pid: i32) -> Option<(i32, char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state, ppid, ... starttime is field 22 of the line, 20 of `rest`.
    Some((f.get(1)?.parse().ok()?, f.first()?.chars().next()?, f.get(19)?.parse().ok()?))
}

/// Every live descendant of `root`.
pub fn descendants(root: i32) -> BTreeSet<ProcId> {
    let all: Vec<(i32, i32, char, u64)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| stat(pid).map(|(ppid, state, start)| (pid, ppid, state, start)))
        .collect();
    let mut found = BTreeSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for (pid, _, state, start) in all.iter().filter(|(_, ppid, _, _)| *ppid == p) {
            if *state != 'Z' && found.insert((*pid, *start)) {
                frontier.push(*pid);
            }
        }
    }
    found
}

pub fn alive(p: &ProcId) -> bool {
    stat(p.0).is_some_and(|(_, state, start)| start == p.1 && state != 'Z' && state != 'X')
}

pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .iter()
        .map(|b| if *b == 0 { ' ' } else { *b as char })
        .collect()
}
