//! A process started in a lab namespace, with its output in files, killed when dropped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long [`Proc::stop`] waits after SIGTERM before sending SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// A running (or finished) process. `ip netns exec` execs in place, so [`Proc::pid`] is the program
/// itself and signals reach it directly. Dropping a `Proc` stops it (SIGTERM, then SIGKILL).
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl Proc {
    pub(crate) fn new(
        name: String,
        child: Child,
        stdout_path: PathBuf,
        stderr_path: PathBuf,
    ) -> Proc {
        Proc {
            name,
            child,
            status: None,
            stdout_path,
            stderr_path,
        }
    }

    /// A short label (program name and host), used in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Process id of the program.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// File receiving the program's standard output.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// File receiving the program's standard error.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Everything written to standard output so far (lossy UTF-8; empty if unreadable).
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// Everything written to standard error so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// Standard output followed by standard error.
    pub fn log(&self) -> String {
        let (out, err) = (self.stdout(), self.stderr());
        let mut s = String::with_capacity(out.len() + err.len() + 1);
        s.push_str(&out);
        if !out.is_empty() && !out.ends_with('\n') && !err.is_empty() {
            s.push('\n');
        }
        s.push_str(&err);
        s
    }

    /// The exit status if the program has exited (reaps it), `None` while it runs.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Whether the program is still running.
    pub fn is_running(&mut self) -> bool {
        self.try_exit().is_none()
    }

    /// Sends signal `sig` (e.g. `libc::SIGINT`, `libc::SIGUSR1`).
    ///
    /// # Errors
    /// If the program already exited (its pid may belong to someone else by now) or `kill` fails.
    pub fn signal(&mut self, sig: i32) -> anyhow::Result<()> {
        if let Some(st) = self.try_exit() {
            bail!("{} already exited ({st}); not signalling", self.name);
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child, so it
        // cannot have been recycled for another process.
        let rc = unsafe { libc::kill(pid, sig) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("kill {pid} sig {sig}"));
        }
        Ok(())
    }

    /// Waits (polling, bounded by `timeout`) for the program to exit.
    ///
    /// # Errors
    /// If it is still running when `timeout` passes (it keeps running).
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_exit() {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits (bounded) until the program's stdout or stderr contains `needle`.
    ///
    /// # Errors
    /// On timeout, or if the program exits first; the message includes its output.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(st) = self.try_exit() {
                if self.log().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "{} exited ({st}) before printing {needle:?}; output:\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; output:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the program: SIGTERM, up to [`STOP_GRACE`], then SIGKILL; returns its exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if let Some(st) = self.try_exit() {
            return Some(st);
        }
        let _ = self.signal(libc::SIGTERM);
        if let Ok(st) = self.wait_exit(STOP_GRACE) {
            return Some(st);
        }
        let _ = self.child.kill();
        self.wait_exit(STOP_GRACE).ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub(crate) fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn spawn(dir: &Path, script: &str) -> Proc {
        let (out, err) = (dir.join("out"), dir.join("err"));
        let child = Command::new("sh")
            .args(["-c", script])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Proc::new("sh".into(), child, out, err)
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lab-proc-test-{}-{tag}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn output_exit_and_signals() {
        let d = tempdir("a");
        let mut p = spawn(&d, "echo out; echo err >&2; exit 3");
        assert_eq!(
            p.wait_exit(Duration::from_secs(10)).unwrap().code(),
            Some(3)
        );
        assert_eq!(p.log(), "out\nerr\n");
        assert!(p.signal(libc::SIGTERM).is_err());

        let mut p = spawn(&d, "echo ready; exec sleep 60");
        p.wait_for_log("ready", Duration::from_secs(10)).unwrap();
        assert!(p.is_running());
        assert!(p.wait_exit(Duration::from_millis(50)).is_err());
        p.signal(libc::SIGKILL).unwrap();
        let st = p.wait_exit(Duration::from_secs(10)).unwrap();
        assert!(!st.success());

        // SIGTERM ignored: stop() escalates to SIGKILL.
        let mut p = spawn(&d, "trap '' TERM; echo ready; while :; do sleep 1; done");
        p.wait_for_log("ready", Duration::from_secs(10)).unwrap();
        assert!(p.stop().is_some());
        assert!(!p.is_running());
        fs::remove_dir_all(&d).unwrap();
    }
}
