//! Generates the tonic/prost code from `hubvault/v1/hubvault.proto` with the
//! vendored protoc, so a fresh machine needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(config, &["hubvault/v1/hubvault.proto"], &["."])?;
    println!("cargo:rerun-if-changed=hubvault/v1/hubvault.proto");
    Ok(())
}
