//! Generates the gRPC code from proto/ with protox (a protobuf compiler in
//! Rust: no `protoc` needed) and tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const FILES: &[&str] =
        &["flow/flow.proto", "relay/relay.proto", "observer/observer.proto", "grpc/health/v1/health.proto"];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(FILES, ["proto"])?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(descriptors)?;
    Ok(())
}
