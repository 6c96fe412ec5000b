//! One listener per disk: each frontend connection gets a fresh vhost-user device, so a VM
//! that shuts down or a QEMU that is killed leaves the disk ready for the next connection.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tracing::{error, info, warn};
use vhost::vhost_user::{BackendReqHandler, Error as VuError, Listener};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{BlkBackend, DelaySpecError, TestDelay};
use crate::handler::{self, Handler};
use crate::virtio::BlkDevice;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Cannot listen on {}", path.display())]
    Listen {
        path: PathBuf,
        #[source]
        source: VuError,
    },
    #[error("Cannot accept a frontend")]
    Accept(#[source] VuError),
    #[error("Cannot set up the device for a frontend")]
    Setup(#[source] handler::Error),
    #[error("Cannot keep a handle on the frontend's connection")]
    Clone(#[source] std::io::Error),
    #[error("Vhost-user session failed")]
    Session(#[source] VuError),
    #[error("Test hook refused")]
    TestHook(#[source] DelaySpecError),
}

/// Connection state shared between a disk's server thread and whoever stops it.
#[derive(Default)]
struct Slot {
    stopping: bool,
    /// A frontend is connected and its worker threads may be running.
    busy: bool,
    /// The connection, to end it from another thread.
    active: Option<UnixStream>,
}

/// Stops a [`DiskServer`] from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<(Mutex<Slot>, Condvar)>);

impl std::fmt::Debug for Stopper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stopper")
    }
}

impl Stopper {
    /// Refuses new connections, disconnects the current one and waits until its in-flight
    /// requests have completed and the disk has been flushed.
    pub fn stop(&self) {
        let (lock, cv) = &*self.0;
        let mut slot = lock.lock().unwrap_or_else(PoisonError::into_inner);
        slot.stopping = true;
        if let Some(c) = &slot.active {
            let _ = c.shutdown(Shutdown::Both);
        }
        while slot.busy {
            slot = cv.wait(slot).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// Serves one disk on its vhost-user socket, one frontend at a time.
pub struct DiskServer {
    name: String,
    dev: Arc<BlkDevice>,
    listener: Listener,
    socket: PathBuf,
    num_queues: usize,
    delay: Option<TestDelay>,
    stopper: Stopper,
}

impl std::fmt::Debug for DiskServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskServer").field("name", &self.name).field("socket", &self.socket).finish()
    }
}

impl DiskServer {
    /// Binds the socket now, so that a bad path fails at start-up rather than in a thread.
    /// Reads the test hook ([`TestDelay`]) from the environment, once, here.
    pub fn bind(name: String, dev: Arc<BlkDevice>, socket: &Path, num_queues: usize) -> Result<Self, Error> {
        let delay = TestDelay::from_env().map_err(Error::TestHook)?;
        if let Some(d) = &delay {
            warn!(disk = %name, hook = ?d, "test hook on: chosen requests are held before they run");
        }
        let listener =
            Listener::new(socket, true).map_err(|source| Error::Listen { path: socket.to_owned(), source })?;
        Ok(DiskServer {
            name,
            dev,
            listener,
            socket: socket.to_owned(),
            num_queues,
            delay,
            stopper: Stopper(Arc::default()),
        })
    }

    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Accepts and serves frontends until stopped.
    pub fn run(mut self) {
        loop {
            if let Err(e) = self.serve_one() {
                // Accept failures (out of descriptors, say) are retried, not fatal.
                error!(disk = %self.name, error = %livesnap_proto::error::chain(&e), "vhost-user connection failed");
                std::thread::sleep(Duration::from_millis(100));
            }
            if self.slot().stopping {
                return;
            }
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.stopper.0 .0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn serve_one(&mut self) -> Result<(), Error> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(self.dev.clone(), mem.clone(), self.num_queues, self.delay.clone()));
        let handler = Arc::new(Mutex::new(Handler::new(backend, mem).map_err(Error::Setup)?));
        let stream = loop {
            if let Some(s) = self.listener.accept().map_err(Error::Accept)? {
                break s;
            }
        };
        let mut session = BackendReqHandler::from_stream(stream, handler.clone());
        {
            let mut slot = self.slot();
            let conn = session.try_clone_connection().map_err(Error::Clone)?;
            if slot.stopping {
                let _ = conn.shutdown(Shutdown::Both);
            }
            slot.busy = true;
            slot.active = Some(conn);
        }
        info!(disk = %self.name, "frontend connected");
        let result = loop {
            if let Err(e) = session.handle_request() {
                break e;
            }
        };
        drop(session);
        // Every request the queues took completes before the disk is flushed.
        handler.lock().unwrap_or_else(PoisonError::into_inner).shutdown();
        if let Err(e) = self.dev.disk.flush() {
            warn!(disk = %self.name, error = %livesnap_proto::error::chain(&e), "flush after disconnect failed");
        }
        info!(disk = %self.name, "frontend disconnected");
        let mut slot = self.slot();
        slot.busy = false;
        slot.active = None;
        self.stopper.0 .1.notify_all();
        match result {
            // A VM that shuts down or a QEMU that is killed just goes away; so does a
            // connection we shut down.
            VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_) => Ok(()),
            _ if slot.stopping => Ok(()),
            e => Err(Error::Session(e)),
        }
    }
}
