//! The built-in tiny test guest (skeleton; see issue 5).
