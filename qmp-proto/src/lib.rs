//! QMP message types and a streaming decoder (skeleton; see issue 2).
#![deny(missing_docs)]
