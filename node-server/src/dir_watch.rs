//! Wake-ups for tasks that would otherwise only poll: a directory's changes (the store, the
//! node's CNI config directory) through inotify.

use std::path::Path;
use std::sync::{Arc, Weak};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::sync::Notify;

/// Wakes its owner whenever a file in `dir` is written, renamed or removed. A blocking reader
/// thread keeps the code free of raw-fd registration; `Notify` coalesces bursts into one wake-up.
/// The thread holds only a weak reference and ends with its owner. `None`: no inotify.
pub fn watch_dir(dir: &Path, thread_name: &str) -> Option<Arc<Notify>> {
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).ok()?;
    let flags = AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_DELETE;
    inotify.add_watch(dir, flags).ok()?;
    let notify = Arc::new(Notify::new());
    let waker: Weak<Notify> = Arc::downgrade(&notify);
    std::thread::Builder::new()
        .name(thread_name.into())
        .spawn(move || {
            while inotify.read_events().is_ok() {
                match waker.upgrade() {
                    Some(n) => n.notify_one(),
                    None => break,
                }
            }
        })
        .ok()?;
    Some(notify)
}

/// The next wake-up of a watcher; never, without one (the caller's tick still runs).
pub async fn notified(watcher: &Option<Arc<Notify>>) {
    match watcher {
        Some(n) => n.notified().await,
        None => std::future::pending().await,
    }
}
