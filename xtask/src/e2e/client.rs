//! End-to-end scenarios for the client area.

use super::Scenario;

/// The scenarios of this area.
pub fn scenarios() -> Vec<Scenario> {
    Vec::new()
}
