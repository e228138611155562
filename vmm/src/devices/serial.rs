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

/// Saved UART registers (vm-superio's `SerialState`, serialisable).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// DLL.
    pub baud_divisor_low: u8,
    /// DLM.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
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

    /// A UART with restored registers.
    pub fn from_state(
        state: &SerialSnapshot,
        irq: EventFd,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(
            &s,
            IrqFdTrigger(irq),
            vm_superio::serial::NoEvents,
            SerialSink::new(out),
        )
        .map_err(|e| format!("invalid serial state: {e:?}"))?;
        Ok(SerialDevice { uart })
    }

    /// The UART registers.
    pub fn state(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
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

    #[test]
    fn state_round_trip() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialDevice::new(evt, Box::new(io::sink()));
        s.pio_write(7, &[0x5a]); // scratch
        s.pio_write(1, &[0x02]); // IER: THR empty interrupt
        s.pio_write(3, &[0x03]); // LCR: 8n1
        let st = s.state();
        let json = serde_json::to_string(&st).unwrap();
        let back: SerialSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut r = SerialDevice::from_state(&back, evt, Box::new(io::sink())).unwrap();
        let mut b = [0u8];
        r.pio_read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.pio_read(3, &mut b);
        assert_eq!(b[0], 0x03);
        assert_eq!(r.state(), st);
        let mut bad = st.clone();
        bad.in_buffer = vec![0; 1000];
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(SerialDevice::from_state(&bad, evt, Box::new(io::sink())).is_err());
    }
}
