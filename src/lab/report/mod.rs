//! What a run produced: the result model, failure attribution, tables, timeline, live progress,
//! the spans written and forwarded.

pub mod attribution;
pub mod progress;
pub mod result;
pub mod timeline;
pub mod trace_export;
