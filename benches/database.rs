//! database benchmark: run with `cargo bench --bench database` against the testbed.

fn main() {
    eprintln!("the database benchmark is not written yet");
    std::process::exit(2);
}
