//! The qtest protocol and machine (skeleton; see issue 8).
