//! What a run produced: the result model, failure attribution, tables, timeline, live progress.

pub mod attribution;
pub mod progress;
pub mod result;
pub mod timeline;
