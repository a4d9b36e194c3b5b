//! Integration tests of machine-core against stub `qemu` programs (shell scripts that
//! misbehave on purpose): launch failures, rollback, fd allow-list, cleanup, shutdown ladder.

mod fleet;
mod launch;
mod lifecycle;
mod qtest;
mod replay;
mod stepping;
mod stub;
