//! Compiles the `.proto` files with protox (no system `protoc`) and tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTOS: [&str; 3] = ["agent.proto", "snapshot.proto", "livesnapd.proto"];
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
