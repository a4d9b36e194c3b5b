//! QMP client on mio (skeleton; see issue 3).
#![deny(missing_docs)]
