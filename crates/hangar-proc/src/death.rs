//! The parent-death signal, set in the child between `fork` and `exec` (Linux only).

use tokio::process::Command;

/// Make `cmd`'s child get `SIGKILL` when the thread that forks it exits (the spawner
/// thread, which lives as long as the process), and exit at once if the agent is already
/// gone by the time the signal is set.
#[cfg(target_os = "linux")]
#[allow(unsafe_code, reason = "pre_exec is unsafe; the closure only makes two async-signal-safe system calls")]
pub(crate) fn arm(cmd: &mut Command) {
    use nix::sys::prctl::set_pdeathsig;
    use nix::sys::signal::Signal;
    use nix::unistd::getppid;

    let agent = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It calls prctl(2) and getppid(2) only, allocates nothing (a raw OS
    // error is an io::Error without allocation) and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            set_pdeathsig(Signal::SIGKILL)?;
            if getppid() != agent {
                // The agent died before the signal was armed: it would never come.
                return Err(std::io::Error::from(nix::errno::Errno::ESRCH));
            }
            Ok(())
        });
    }
}

/// No parent-death signal outside Linux; the ledger stops leftovers at the next start.
#[cfg(not(target_os = "linux"))]
pub(crate) fn arm(_cmd: &mut Command) {}
