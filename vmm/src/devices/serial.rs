//! The 8250 UART at 0x3f8 (COM1), wrapping vm-superio's emulation.
//!
//! Output goes to a log file or stderr; the interrupt is an eventfd that the
//! builder registers as an irqfd for IRQ 4, which the guest needs for
//! interrupt-driven (user space) output.

use std::io::{self, Write};

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::timeline::{self, Milestone};

/// First I/O port of COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// Number of ports of an 8250.
pub const COM_PORT_COUNT: u16 = 8;

/// Raises IRQ 4 by writing to an irqfd.
#[derive(Debug)]
pub struct IrqFdTrigger(pub EventFd);

impl Trigger for IrqFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where serial output goes; records when the guest writes its first byte.
pub struct SerialSink {
    out: Box<dyn Write + Send>,
    seen_output: bool,
}

impl SerialSink {
    /// Wraps a writer.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        SerialSink {
            out,
            seen_output: false,
        }
    }
}

impl Write for SerialSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !self.seen_output && !buf.is_empty() {
            self.seen_output = true;
            timeline::mark(Milestone::FirstSerialByte);
        }
        self.out.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// COM1 as the I/O bus sees it.
pub struct SerialDevice {
    uart: Serial<IrqFdTrigger, vm_superio::serial::NoEvents, SerialSink>,
}

impl SerialDevice {
    /// A UART that writes to `out` and raises its interrupt through `irq`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            uart: Serial::new(IrqFdTrigger(irq), SerialSink::new(out)),
        }
    }

    /// The interrupt eventfd (to register as an irqfd).
    pub fn irq_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Port read at `offset` from [`COM1_BASE`].
    pub fn pio_read(&mut self, offset: u16, data: &mut [u8]) {
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = self.uart.read(off);
        }
    }

    /// Port write at `offset` from [`COM1_BASE`].
    pub fn pio_write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(off), Some(value)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = self.uart.write(off, *value) {
                tracing::warn!("serial: {e}");
            }
        }
    }

    /// Flushes buffered output.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_written_to_thr_reach_the_sink() {
        let out = Shared::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(evt, Box::new(out.clone()));
        for b in b"hi\n" {
            s.pio_write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        // Line status register: THR empty.
        let mut lsr = [0u8];
        s.pio_read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
        // Out-of-range offsets are ignored.
        s.pio_write(300, &[1]);
    }
}
