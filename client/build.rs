//! Generates the gRPC stubs from `proto/` with protox, so no system `protoc`
//! is needed, and keeps the encoded descriptors for gRPC server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = "../proto";
    let files = [
        "warden/v1/warden.proto",
        "warden/v1/admin.proto",
        "warden/v1/peer.proto",
    ];
    println!("cargo:rerun-if-changed={proto_root}");
    let descriptors = protox::compile(files, [proto_root])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("warden_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        // prost, except that an undecodable CheckRequest is answered in-band
        // (see src/codec.rs).
        .codec_path("crate::codec::Codec")
        // The request body as `Bytes`: decoded as a view of the received
        // frame instead of a copy (it can be up to max_body_bytes, and is
        // hashed where it lies).
        .bytes(".warden.v1.CheckRequest.body")
        .btree_map(".warden.v1.CheckResponse.headers")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
