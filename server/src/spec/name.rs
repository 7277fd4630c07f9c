//! The one rule for every name a client chooses (model, tensor, group, worker):
//! non-empty, bounded, printable, because names end up in logs, metric labels
//! and error messages.

use ps_proto::transport::MAX_NAME_BYTES;

/// Why a user-chosen name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name must not be empty")]
    Empty {
        /// What the name names.
        kind: &'static str,
    },
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("{kind} name is {bytes} bytes; the limit is {MAX_NAME_BYTES}")]
    TooLong {
        /// What the name names.
        kind: &'static str,
        /// Its length in bytes.
        bytes: usize,
    },
    /// The name has control characters.
    #[error("{kind} name {name:?} contains control characters")]
    ControlCharacters {
        /// What the name names.
        kind: &'static str,
        /// The name.
        name: String,
    },
}

/// Checks a user-chosen name of `kind` (model, tensor, group, worker).
pub fn check_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { kind, bytes: name.len() });
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(NameError::ControlCharacters { kind, name: name.to_string() });
    }
    Ok(())
}
