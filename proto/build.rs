//! Generates the gRPC code with the protoc that `protoc-bin-vendored` ships,
//! so a build needs nothing installed by hand.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/paramserver/v1/paramserver.proto";
    // tonic-prost-build does not announce its inputs, so without this line
    // every change anywhere in the crate would rerun code generation.
    println!("cargo:rerun-if-changed={PROTO}");
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        // Payload fields as `bytes::Bytes`: zero-copy slices of the HTTP/2 frames.
        .bytes(".paramserver.v1.TensorChunk.payload")
        .bytes(".paramserver.v1.BlockBytes.data")
        // Decoding that keeps small or padded messages from pinning receive buffers.
        .codec_path("crate::wire_codec::HeldCodec")
        .compile_with_config(config, &[PROTO], &["proto"])?;
    Ok(())
}
