//! Ctrl-C (SIGINT) and SIGTERM, which Slurm sends before it preempts a job or its time runs
//! out: the first asks the running command to stop at its next safe point (a training run
//! finishes its step and writes a checkpoint; a sweep passes the signal on to its runs and waits
//! for them). A Ctrl-C after that ends the process at once, which loses nothing older than the
//! last checkpoint because every checkpoint is swapped in whole ([`crate::run_dir`]). A repeated
//! SIGTERM is the same request again, not impatience: on preemption Slurm signals every process
//! of a job, so a sweep's run hears it from Slurm and from the sweep, and must still checkpoint.
//!
//! The binary calls [`install`] once; library code asks [`requested`] at its safe points.
//! Without `install` (the library's own tests), `requested` is always `None`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use serde::Serialize;
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::Error;

/// A signal that asked estafet to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Signal {
    #[serde(rename = "SIGINT")]
    Interrupt,
    #[serde(rename = "SIGTERM")]
    Terminate,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Interrupt => "SIGINT",
            Signal::Terminate => "SIGTERM",
        }
    }

    fn number(self) -> i32 {
        match self {
            Signal::Interrupt => SIGINT,
            Signal::Terminate => SIGTERM,
        }
    }

    /// The shell's convention for a process ended by a signal: 128 + its number (130, 143).
    pub fn exit_code(self) -> i32 {
        128 + self.number()
    }
}

struct Flags {
    requested: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Installs the handlers for SIGINT and SIGTERM (once; later calls do nothing).
pub fn install() -> Result<(), Error> {
    if FLAGS.get().is_some() {
        return Ok(());
    }
    let flags = Flags {
        requested: Arc::new(AtomicBool::new(false)),
        which: Arc::new(AtomicUsize::new(0)),
    };
    // Handlers run in the order they were registered: this one sees the flag as the previous
    // signal left it, so only a Ctrl-C after an earlier signal exits at once.
    signal_hook::flag::register_conditional_shutdown(
        SIGINT,
        128 + SIGINT,
        Arc::clone(&flags.requested),
    )
    .context("cannot install the signal handlers")?;
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register_usize(signal, Arc::clone(&flags.which), signal as usize)
            .and_then(|_| signal_hook::flag::register(signal, Arc::clone(&flags.requested)))
            .context("cannot install the signal handlers")?;
    }
    FLAGS.set(flags).ok();
    Ok(())
}

/// The signal that asked to stop, if one has arrived.
pub fn requested() -> Option<Signal> {
    let flags = FLAGS.get()?;
    if !flags.requested.load(Ordering::SeqCst) {
        return None;
    }
    Some(match flags.which.load(Ordering::SeqCst) as i32 {
        SIGTERM => Signal::Terminate,
        _ => Signal::Interrupt,
    })
}

/// Asks process `pid` to stop as SIGTERM does (a sweep passes a stop on to its runs).
pub fn terminate(pid: u32) {
    // SAFETY: kill(2) only sends a signal; an exited child's pid is an ESRCH, ignored.
    #[cfg(unix)]
    unsafe {
        libc::kill(pid as libc::pid_t, SIGTERM);
    }
    #[cfg(not(unix))]
    let _ = pid;
}

/// This process's command line, made to continue its work: with `--out` (when it was not
/// given, the directory chosen now) and, for `run`, `--resume`; quoted for a POSIX shell.
pub fn continue_command(out: &std::path::Path, resume: bool) -> String {
    let mut args: Vec<String> = std::env::args().collect();
    let has = |flag: &str, args: &[String]| {
        args.iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    if !has("--out", &args) {
        args.push("--out".into());
        args.push(out.display().to_string());
    }
    if resume && !has("--resume", &args) {
        args.push("--resume".into());
    }
    args.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
