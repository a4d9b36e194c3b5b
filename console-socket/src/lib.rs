//! Serial console drainer (skeleton; see issue 4).
#![deny(missing_docs)]
