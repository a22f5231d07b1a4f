//! A fake `prlctl`/`prlsrvctl` for tests.
fn main() {}
