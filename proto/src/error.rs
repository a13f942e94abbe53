use crate::hello::Role;

/// What can go wrong on an IPC connection. Every variant closes that
/// connection only; none is a reason for a daemon to stop.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket failed (includes the peer going away mid-write).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// A frame announced more bytes than the current state allows.
    #[error("frame of {len} bytes is over the limit for this state")]
    FrameTooLarge { len: usize },
    /// The connection ended in the middle of a frame.
    #[error("truncated frame: connection closed after {got} of {expected} bytes")]
    Truncated { expected: usize, got: usize },
    /// The bytes do not decode as the expected message.
    #[error("undecodable frame: {0}")]
    Decode(String),
    /// A message could not be encoded (e.g. larger than a frame).
    #[error("cannot encode message: {0}")]
    Encode(String),
    /// The message decoded but bytes were left over.
    #[error("frame has {extra} trailing bytes after the message")]
    TrailingBytes { extra: usize },
    /// The peer speaks another protocol version.
    #[error("protocol version mismatch: ours is {ours}, the peer's is {theirs}")]
    VersionMismatch { ours: u32, theirs: u32 },
    /// The peer's role may not use this socket.
    #[error("role {role:?} may not connect to this socket")]
    RoleNotAllowed { role: Role },
    /// The peer's uid is not the one configured for its role.
    #[error("peer uid {uid} is not allowed to be {role:?}")]
    PeerNotAllowed { uid: u32, role: Role },
    /// The peer sent nothing for longer than this connection allows.
    #[error("peer idle for more than {0:?}")]
    Idle(std::time::Duration),
    /// A message arrived that is not valid in the current state.
    #[error("unexpected message {0} in this state")]
    Unexpected(&'static str),
    /// A job frame arrived without its file descriptor.
    #[error("job frame arrived without its file descriptor")]
    MissingFd,
}
