//! hubvault's wire protocol: the generated tonic/prost code for
//! `hubvault/v1/hubvault.proto` ([`pb`]), the limits both sides enforce
//! ([`limits`]), and the one validated conversion layer from wire messages
//! to `repo-format` types ([`convert`]).

pub mod convert;

/// Generated messages, clients and servers (package `hubvault.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("hubvault.v1");
}

/// Protocol constants shared by the collector and the agents.
pub mod limits {
    /// The protocol version every request carries. 2: an upload message
    /// carries many blobs.
    pub const PROTOCOL: u32 = 2;
    /// Largest decoded gRPC message, in bytes.
    pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
    /// Largest sealed blob accepted in an upload, in bytes.
    pub const MAX_UPLOAD_BLOB: usize = MAX_MESSAGE - 1024;
    /// Most blobs in one upload message.
    pub const MAX_BLOBS_PER_UPLOAD: usize = 4096;
    /// Most ids in one MissingBlobs or ReadBlobs request.
    pub const MAX_IDS_PER_REQUEST: usize = 4096;
    /// Longest enrollment token validity, in seconds.
    pub const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
}
