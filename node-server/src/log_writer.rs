//! Log lines leave the request path through a buffer that one writer thread drains in batches.
//!
//! Every credential answer is an audit line, so the price of a line is paid per answer. A
//! channel of lines with a thread per writer (tracing-appender's `non_blocking`) wakes that
//! thread for every line, and its receiver spins with `sched_yield` before it sleeps: on a
//! busy node that is a futex wake and several yields per answer. Here a line is appended to a
//! shared buffer under a mutex, and the writer thread is woken only when it sleeps. Once woken
//! it lingers for [`LINGER`] (or until [`BATCH`] bytes wait) before it writes, so that under
//! load one wake and one `write` carry the lines of a whole millisecond instead of one each
//! (profiled: waking the writer per line and writing each line alone cost a third of
//! iamlinkd's CPU per cached answer). Lines are never dropped: a writer that falls more than
//! [`HIGH_WATER`] behind makes the loggers wait for it (as `lossy(false)` did).

use std::io::{self, Write};
use std::mem;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// Bytes of lines waiting before loggers wait for the writer (≈ 3,000 audit lines).
const HIGH_WATER: usize = 1 << 20;
/// A batch buffer larger than this after a burst is given back to the allocator.
const KEEP_CAPACITY: usize = 64 << 10;
/// How long the woken writer waits for more lines before it writes: a line reaches its file at
/// most this much later, and a busy daemon pays one wake and one `write` per this interval.
const LINGER: Duration = Duration::from_millis(1);
/// Bytes that end the linger early (≈ 100 audit lines): one `write` is big enough by then.
const BATCH: usize = 32 << 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Waits for lines, and must be woken for the next one.
    Idle,
    /// Woken, collecting lines for [`LINGER`]; woken early only for a full [`BATCH`].
    Lingering,
    /// Writing a batch with the lock released; sees what arrived when it is done.
    Writing,
}

struct State {
    pending: Vec<u8>,
    writer: Writer,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Lines arrived, or closed: wakes the writer thread.
    ready: Condvar,
    /// A batch was written: wakes loggers waiting above the high-water mark.
    drained: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is consistent after every statement; a panicking logger leaves it usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The `MakeWriter` for a fmt layer: each formatted event is appended as one write.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// Flushes what is buffered and stops the writer thread when dropped (at exit).
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A writer thread named `name` writing to `sink`, and its handles.
pub fn spawn(name: &str, sink: Box<dyn Write + Send>) -> io::Result<(BatchWriter, FlushGuard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { pending: Vec::new(), writer: Writer::Writing, closed: false }),
        ready: Condvar::new(),
        drained: Condvar::new(),
    });
    let thread = {
        let shared = shared.clone();
        std::thread::Builder::new().name(name.into()).spawn(move || drain(&shared, sink))?
    };
    Ok((BatchWriter { shared: shared.clone() }, FlushGuard { shared, thread: Some(thread) }))
}

/// The writer thread: takes everything pending at once, writes it with the lock released.
fn drain(shared: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut batch = Vec::new();
    let mut state = shared.lock();
    loop {
        while state.pending.is_empty() && !state.closed {
            state.writer = Writer::Idle;
            state = shared.ready.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.writer = Writer::Lingering;
        let until = Instant::now() + LINGER;
        while !state.closed && state.pending.len() < BATCH {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = shared.ready.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        state.writer = Writer::Writing;
        if state.pending.is_empty() {
            break; // closed and everything written
        }
        mem::swap(&mut batch, &mut state.pending);
        drop(state);
        // A failed write (stderr closed) loses these lines only; there is nowhere to report it.
        let _ = sink.write_all(&batch).and_then(|()| sink.flush());
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch = Vec::new();
        }
        state = shared.lock();
        shared.drained.notify_all();
    }
}

impl BatchWriter {
    fn append(&self, line: &[u8]) {
        let mut state = self.shared.lock();
        while state.pending.len() >= HIGH_WATER && !state.closed {
            state = self.shared.drained.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.pending.extend_from_slice(line);
        let wake = match state.writer {
            // Only a sleeping writer is woken, and only once: the lines that follow ride along.
            Writer::Idle => true,
            Writer::Lingering => state.pending.len() >= BATCH,
            Writer::Writing => false,
        };
        if wake {
            state.writer = Writer::Writing;
            self.shared.ready.notify_one();
        }
    }
}

impl Write for &BatchWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = &'a BatchWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink the test can read back.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_from_every_thread_is_written_once_in_its_threads_order() {
        let sink = Sink::default();
        let (writer, guard) = spawn("test-log", Box::new(sink.clone())).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        writer.make_writer().write_all(format!("{t} {i}\n").as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard); // flushes
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let mut next = [0u32; 4];
        for line in text.lines() {
            let (t, i) = line.split_once(' ').unwrap();
            let (t, i): (usize, u32) = (t.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[t], "thread {t}'s lines in order, none lost or doubled");
            next[t] += 1;
        }
        assert_eq!(next, [5000; 4]);
    }

    #[test]
    fn a_lone_line_is_written_without_waiting_for_more_lines_or_the_exit() {
        let sink = Sink::default();
        let (writer, _guard) = spawn("test-log", Box::new(sink.clone())).unwrap();
        writer.make_writer().write_all(b"only line\n").unwrap();
        let started = Instant::now();
        // Bounded: the writer lingers 1 ms; two seconds is a stalled writer on any machine.
        while sink.0.lock().unwrap().is_empty() {
            assert!(started.elapsed() < Duration::from_secs(2), "a lone line was not written within 2 s");
            std::thread::yield_now();
        }
        assert_eq!(sink.0.lock().unwrap().as_slice(), b"only line\n");
    }
}
