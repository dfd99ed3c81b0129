//! The same code layout as `weft-proxy` (see crates/weft-proxy/build.rs): `weft proxy`
//! runs the same functions, under the same symbol names.

#[path = "../weft-proxy/build.rs"]
mod layout;

fn main() {
    layout::main();
}
