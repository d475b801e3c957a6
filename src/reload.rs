//! Hot reload: validate first, then swap, never half-applied.
//!
//! A new config is parsed and validated (certificates loaded), new listener addresses are
//! bound and the new snapshot built before anything changes; any error leaves the old config
//! in force. Then the snapshot is published in one store: new connections and requests use
//! it at once, requests in flight and open tunnels keep the backend they have, and per-backend
//! state carries over by identity. Backends that went away (or are now `down`) drain: their
//! tunnels close after `drain_timeout`, spread over `drain_spread`. Listeners whose key is
//! unchanged keep their socket; added ones start, removed ones stop accepting.
//!
//! Triggers: SIGHUP, a change of the config file or a file it names (polled), and
//! `tidegate reload`, which signals the process named in the pid file and reads the outcome
//! from the status file beside it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::Shared;
use crate::config::{self, Config};
use crate::listener::{self, listener_key};
use crate::runtime::{BackendId, DrainPlan, Runtime};

/// How many reload outcomes are kept for the admin API.
const HISTORY: usize = 20;

/// One reload attempt's outcome.
#[derive(Debug, Clone)]
pub struct ReloadOutcome {
    pub attempt: u64,
    pub at: SystemTime,
    /// The generation now in force.
    pub generation: u64,
    pub ok: bool,
    /// Empty when ok; else every problem, one per line.
    pub message: String,
    pub took: Duration,
}

#[derive(Debug, Default)]
pub struct ReloadStats {
    pub attempts: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    history: Mutex<VecDeque<ReloadOutcome>>,
}

impl ReloadStats {
    pub fn history(&self) -> Vec<ReloadOutcome> {
        self.history.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    fn record(&self, o: ReloadOutcome) {
        let mut h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if h.len() == HISTORY {
            h.pop_front();
        }
        h.push_back(o);
    }
}

/// Loads `path` and applies it; on any problem the old config stays and the problems are
/// logged as `FILE:LINE:COL: message`.
pub fn reload_file(shared: &Arc<Shared>, path: &Path) -> Result<u64, String> {
    match config::load(path) {
        Ok(c) => apply(shared, c),
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!("{e}");
            }
            let msg = errors.to_string();
            refused(shared, Instant::now(), msg.clone());
            Err(msg)
        }
    }
}

fn refused(shared: &Shared, started: Instant, message: String) {
    let attempt = shared.reloads.attempts.fetch_add(1, Ordering::Relaxed) + 1;
    shared.reloads.failed.fetch_add(1, Ordering::Relaxed);
    let generation = shared.runtime.load().generation;
    tracing::error!(generation, "reload refused; the previous config stays in force");
    shared.reloads.record(ReloadOutcome { attempt, at: SystemTime::now(), generation, ok: false, message, took: started.elapsed() });
}

/// Applies a validated config as a reload. Returns the new generation.
pub fn apply(shared: &Arc<Shared>, config: Config) -> Result<u64, String> {
    let _one_at_a_time = shared.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
    let started = Instant::now();
    let old = shared.runtime.load_full();
    for w in &config.warnings {
        tracing::warn!("{w}");
    }

    // Bind what is new before changing anything.
    let running: HashMap<String, listener::Running> = shared.listeners.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut keep: HashSet<String> = HashSet::new();
    let mut fresh = Vec::new();
    for l in &config.listeners {
        let key = listener_key(l);
        if running.contains_key(&key) {
            keep.insert(key);
            continue;
        }
        match listener::bind(l) {
            Ok(b) => fresh.push(b),
            Err(e) => {
                let msg = format!("{}: listener {:?}: cannot bind {}: {e}", config.source.display(), l.name, l.bind);
                tracing::error!("{msg}");
                refused(shared, started, msg.clone());
                return Err(msg);
            }
        }
    }
    let rt = match Runtime::build(config, &shared.registry, old.generation + 1) {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("{e}");
            refused(shared, started, e.clone());
            return Err(e);
        }
    };

    shared.health.reconcile(&rt);
    let (drained, resumed) = drains(&old, &rt);
    let generation = rt.generation;
    shared.runtime.store(Arc::new(rt));

    for b in fresh {
        shared.start_listener(b);
    }
    {
        let mut listeners = shared.listeners.lock().unwrap_or_else(|e| e.into_inner());
        listeners.retain(|key, r| {
            let stays = keep.contains(key) || !running.contains_key(key);
            if !stays {
                tracing::info!(listener = %r.name, addr = %r.addr, "listener removed; its open connections finish");
                r.stop.cancel();
            }
            stays
        });
    }

    let attempt = shared.reloads.attempts.fetch_add(1, Ordering::Relaxed) + 1;
    shared.reloads.ok.fetch_add(1, Ordering::Relaxed);
    let took = started.elapsed();
    tracing::info!(generation, drained, resumed, took_us = took.as_micros() as u64, "reload applied");
    shared.reloads.record(ReloadOutcome { attempt, at: SystemTime::now(), generation, ok: true, message: String::new(), took });
    Ok(generation)
}

/// Backends of `old` that `new` lacks, or has `down`, start draining; backends that `new`
/// serves again stop. Returns (started, called off).
fn drains(old: &Runtime, new: &Runtime) -> (usize, usize) {
    let mut serving: HashMap<&BackendId, Option<DrainPlan>> = HashMap::new();
    let now = Instant::now();
    for u in &new.upstreams {
        let plan = DrainPlan { since: now, timeout: u.cfg.drain.timeout, spread: u.cfg.drain.spread, close_code: u.cfg.drain.close_code };
        for b in &u.backends {
            serving.insert(&b.state.id, b.cfg.down.then_some(plan));
        }
    }
    let (mut drained, mut resumed) = (0, 0);
    for u in &new.upstreams {
        // A server down through the admin API keeps draining until the API brings it up.
        for b in u.backends.iter().filter(|b| !b.cfg.down && !b.state.admin().down) {
            if b.state.is_draining() {
                b.state.stop_drain();
                resumed += 1;
            }
        }
    }
    for u in &old.upstreams {
        // The new config's drain settings for this upstream when it still exists (the edit
        // that removed the server may also have set how it drains), else the old ones.
        let d = new.upstreams.iter().find(|n| n.name() == u.name()).map_or(u.cfg.drain, |n| n.cfg.drain);
        let plan = DrainPlan { since: now, timeout: d.timeout, spread: d.spread, close_code: d.close_code };
        for b in &u.backends {
            let plan = match serving.get(&b.state.id) {
                None => Some(plan),
                Some(down) => *down,
            };
            if let Some(p) = plan
                && !b.state.is_draining()
            {
                b.state.start_drain(p);
                drained += 1;
            }
        }
    }
    (drained, resumed)
}

/// Starts listening for SIGHUP (before the pid file is written, so a `tidegate reload`
/// can never hit the default action, which would end the process).
pub fn sighup() -> Option<tokio::signal::unix::Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload by file change only");
            None
        }
    }
}

/// Reloads on SIGHUP and, when `reload_on_change` is on, when a watched file changes.
/// Runs until shutdown.
pub async fn watch(shared: Arc<Shared>, path: PathBuf, mut hup: Option<tokio::signal::unix::Signal>) {
    let mut seen = fingerprint(&shared.runtime.load().config.watched_files());
    let mut pending: Option<Fingerprint> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = async { hup.as_mut().expect("guarded").recv().await }, if hup.is_some() => {
                tracing::info!("SIGHUP received: reloading {}", path.display());
                let t = Instant::now();
                if reload_file(&shared, &path).is_ok() {
                    // Signal to new config serving: parse, validation, bind, build, swap.
                    tracing::info!(total_us = t.elapsed().as_micros() as u64, "reload serving");
                }
                write_status(&shared);
                seen = fingerprint(&shared.runtime.load().config.watched_files());
                pending = None;
            }
            _ = tick.tick() => {
                let rt = shared.runtime.load();
                if !rt.config.reload_on_change {
                    continue;
                }
                let now = fingerprint(&rt.config.watched_files());
                drop(rt);
                if now == seen {
                    pending = None;
                } else if pending.as_ref() == Some(&now) {
                    // Unchanged for a whole tick: the editor is done saving.
                    tracing::info!("config or certificate changed: reloading {}", path.display());
                    let _ = reload_file(&shared, &path);
                    write_status(&shared);
                    seen = now;
                    pending = None;
                } else {
                    pending = Some(now);
                }
            }
        }
    }
}

type Fingerprint = Vec<Option<(SystemTime, u64, u64)>>;

fn fingerprint(files: &[PathBuf]) -> Fingerprint {
    use std::os::unix::fs::MetadataExt;
    files.iter().map(|f| std::fs::metadata(f).ok().map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len(), m.ino()))).collect()
}

/// Where the outcome of the last reload is written for `tidegate reload` to read.
pub fn status_path(pid_file: &Path) -> PathBuf {
    let mut p = pid_file.as_os_str().to_owned();
    p.push(".status");
    PathBuf::from(p)
}

/// Writes the last reload's outcome next to the pid file (when there is one).
pub fn write_status(shared: &Shared) {
    let rt = shared.runtime.load();
    let Some(pid_file) = &rt.config.pid_file else { return };
    let Some(last) = shared.reloads.history().pop() else { return };
    let body = if last.ok {
        format!("attempt {}\nok\ngeneration {}\n", last.attempt, last.generation)
    } else {
        format!("attempt {}\nerror\n{}\n", last.attempt, last.message)
    };
    if let Err(e) = std::fs::write(status_path(pid_file), body) {
        tracing::warn!(error = %e, file = %status_path(pid_file).display(), "cannot write reload status");
    }
}

/// Reads the status file: (attempt, ok, message).
pub fn read_status(pid_file: &Path) -> Option<(u64, bool, String)> {
    let text = std::fs::read_to_string(status_path(pid_file)).ok()?;
    let mut lines = text.lines();
    let attempt = lines.next()?.strip_prefix("attempt ")?.parse().ok()?;
    let ok = lines.next()? == "ok";
    Some((attempt, ok, lines.collect::<Vec<_>>().join("\n")))
}
