//! Child processes in tests: a wait that cannot hang the suite.

use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

/// Waits for `child` to exit, at most `within`. A child still running then is killed
/// (SIGKILL) and the test fails naming `what`: a process that ignores its stop signal
/// is a failure, never a suite that runs into CI's time limit.
///
/// # Panics
/// When the child did not exit in time, or its status cannot be read.
pub fn wait_exit(child: &mut Child, within: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} did not exit within {within:?}: killed");
            }
            Err(e) => panic!("{what}: reading its exit status: {e}"),
        }
    }
}
