//! cache benchmark: run with `cargo bench --bench cache` against the testbed.

fn main() {
    eprintln!("the cache benchmark is not written yet");
    std::process::exit(2);
}
