//! Prints parse errors and analyze messages for a directory: `cargo run -p weft-api --example analyze_dir DIR`.
fn main() {
    let dir = std::env::args().nth(1).unwrap_or_else(|| ".".into());
    let p = weft_api::parse_dir(std::path::Path::new(&dir));
    for e in &p.errors {
        println!("{e}");
    }
    let msgs = weft_api::analyze::analyze(&p.resources);
    for m in &msgs {
        println!("{m}");
    }
    std::process::exit(weft_api::analyze::exit_code(&msgs, weft_api::analyze::Level::Error));
}
