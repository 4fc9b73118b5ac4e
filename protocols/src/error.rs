//! The error type shared by every decoder of this crate.

use em_model::Protocol;

/// Why a frame (or a stretch of bytes) could not be decoded.
///
/// Every variant names the protocol and carries enough detail to log. Use
/// [`DecodeError::reason`] as a metrics label and [`DecodeError::is_fatal`] to decide
/// whether the connection can be kept: a non-fatal error means the codec has already
/// skipped the bad bytes and resynchronised; a fatal one means the byte stream can no
/// longer be framed and the connection should be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A length field announces a frame bigger than the configured limit.
    #[error("{protocol}: frame length {len} exceeds the limit of {max} bytes")]
    Oversized {
        protocol: Protocol,
        len: usize,
        max: usize,
    },
    /// The frame's checksum does not match its content; the frame was dropped.
    #[error(
        "{protocol}: checksum mismatch: frame carries {expected:#06x}, computed {computed:#06x}"
    )]
    BadChecksum {
        protocol: Protocol,
        expected: u32,
        computed: u32,
    },
    /// Well-framed message of a type this codec does not understand; it was skipped.
    #[error("{protocol}: unknown message type {kind}")]
    UnknownType { protocol: Protocol, kind: String },
    /// Bytes that do not belong to any frame were skipped while looking for a frame start.
    #[error("{protocol}: skipped {skipped} bytes of garbage before the next frame start")]
    Garbage { protocol: Protocol, skipped: usize },
    /// A frame's declared end is not where the stop marker should be.
    #[error("{protocol}: frame terminator missing or wrong")]
    BadTerminator { protocol: Protocol },
    /// A field inside an otherwise well-framed message is invalid.
    #[error("{protocol}: malformed {field}: {detail}")]
    Malformed {
        protocol: Protocol,
        field: &'static str,
        detail: String,
    },
    /// A data frame arrived before the login / IMEI handshake that names the device.
    #[error("{protocol}: data frame before login (device unknown on this connection)")]
    NotLoggedIn { protocol: Protocol },
    /// The stream cannot be framed any more (e.g. a Teltonika packet without its
    /// zero preamble); the connection must be closed.
    #[error("{protocol}: framing lost: {detail}")]
    Framing { protocol: Protocol, detail: String },
    /// The stream ended in the middle of a frame.
    #[error("{protocol}: stream ended inside a frame ({remaining} bytes left over)")]
    Truncated {
        protocol: Protocol,
        remaining: usize,
    },
}

impl DecodeError {
    /// Short stable name of the reason, for metrics labels and JSON output.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Oversized { .. } => "oversized",
            DecodeError::BadChecksum { .. } => "bad_checksum",
            DecodeError::UnknownType { .. } => "unknown_type",
            DecodeError::Garbage { .. } => "garbage",
            DecodeError::BadTerminator { .. } => "bad_terminator",
            DecodeError::Malformed { .. } => "malformed",
            DecodeError::NotLoggedIn { .. } => "not_logged_in",
            DecodeError::Framing { .. } => "framing",
            DecodeError::Truncated { .. } => "truncated",
        }
    }

    /// The protocol whose decoder produced the error.
    pub fn protocol(&self) -> Protocol {
        match self {
            DecodeError::Oversized { protocol, .. }
            | DecodeError::BadChecksum { protocol, .. }
            | DecodeError::UnknownType { protocol, .. }
            | DecodeError::Garbage { protocol, .. }
            | DecodeError::BadTerminator { protocol }
            | DecodeError::Malformed { protocol, .. }
            | DecodeError::NotLoggedIn { protocol }
            | DecodeError::Framing { protocol, .. }
            | DecodeError::Truncated { protocol, .. } => *protocol,
        }
    }

    /// True when the stream cannot be resynchronised and the connection should be
    /// closed. Streaming codecs return fatal errors as [`CodecError::Fatal`] (the
    /// `Decoder::Error`), non-fatal ones as `Ok(Some(Err(e)))` items.
    pub fn is_fatal(&self) -> bool {
        match self {
            DecodeError::Framing { .. } => true,
            // Teltonika has no start marker to scan for: a bad length loses the framing.
            DecodeError::Oversized { protocol, .. } => *protocol == Protocol::Teltonika,
            _ => false,
        }
    }

    pub(crate) fn malformed(
        protocol: Protocol,
        field: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        DecodeError::Malformed {
            protocol,
            field,
            detail: detail.into(),
        }
    }
}

/// `Decoder::Error` of the streaming codecs: an I/O error from the transport, or a
/// fatal [`DecodeError`] after which the stream must be dropped.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Fatal(DecodeError),
}

impl CodecError {
    /// The decode error, when this is not an I/O error.
    pub fn decode_error(&self) -> Option<&DecodeError> {
        match self {
            CodecError::Io(_) => None,
            CodecError::Fatal(e) => Some(e),
        }
    }
}

/// Error of the encoders (simulator side): a value that does not fit the wire format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{protocol}: cannot encode {field}: {detail}")]
pub struct EncodeError {
    pub protocol: Protocol,
    pub field: &'static str,
    pub detail: String,
}

impl EncodeError {
    pub(crate) fn new(protocol: Protocol, field: &'static str, detail: impl Into<String>) -> Self {
        EncodeError {
            protocol,
            field,
            detail: detail.into(),
        }
    }
}

impl From<EncodeError> for std::io::Error {
    fn from(e: EncodeError) -> Self {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, e)
    }
}
