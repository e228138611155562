//! Dispatch of guest port I/O and MMIO accesses to devices.

use std::sync::{Arc, Mutex};

use crate::arch::layout::VIRTIO_MMIO_SIZE;
use crate::devices::i8042::{I8042Action, I8042Device, I8042_COMMAND_PORT, I8042_DATA_PORT};
use crate::devices::serial::{SerialDevice, COM1_BASE, COM_PORT_COUNT};
use crate::devices::virtio::mmio::MmioTransport;

/// What a bus access asks of the vCPU loop.
#[derive(Debug, PartialEq, Eq)]
pub enum BusAction {
    /// Carry on.
    None,
    /// The guest reset the machine: stop the VM (clean exit).
    Reset,
}

/// All emulated devices reachable from a vCPU.
pub struct DeviceBus {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042Device>,
    mmio: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
}

impl DeviceBus {
    /// A bus with COM1 and the i8042.
    pub fn new(serial: SerialDevice) -> Self {
        DeviceBus {
            serial: Mutex::new(serial),
            i8042: Mutex::new(I8042Device),
            mmio: Vec::new(),
        }
    }

    /// Adds a virtio-mmio window at `base` (size [`VIRTIO_MMIO_SIZE`]).
    pub fn add_mmio(&mut self, base: u64, transport: Arc<Mutex<MmioTransport>>) {
        self.mmio.push((base, transport));
    }

    /// The UART registers, for a snapshot.
    pub fn serial_state(&self) -> Option<crate::devices::serial::SerialSnapshot> {
        self.serial.lock().ok().map(|s| s.state())
    }

    /// Flushes the serial output.
    pub fn flush_serial(&self) {
        if let Ok(mut s) = self.serial.lock() {
            s.flush();
        }
    }

    fn find_mmio(&self, addr: u64) -> Option<(u64, &Arc<Mutex<MmioTransport>>)> {
        self.mmio
            .iter()
            .find(|(base, _)| addr >= *base && addr - *base < VIRTIO_MMIO_SIZE)
            .map(|(base, t)| (addr - base, t))
    }

    /// Port read; unknown ports read as all ones, like an empty ISA bus.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (COM1_BASE..COM1_BASE + COM_PORT_COUNT).contains(&port) {
            if let Ok(mut s) = self.serial.lock() {
                s.pio_read(port - COM1_BASE, data);
            }
        } else if port == I8042_DATA_PORT || port == I8042_COMMAND_PORT {
            if let Ok(mut d) = self.i8042.lock() {
                d.pio_read(port, data);
            }
        } else {
            data.fill(0xff);
        }
    }

    /// Port write; writes to unknown ports are ignored.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> BusAction {
        if (COM1_BASE..COM1_BASE + COM_PORT_COUNT).contains(&port) {
            if let Ok(mut s) = self.serial.lock() {
                s.pio_write(port - COM1_BASE, data);
            }
        } else if port == I8042_DATA_PORT || port == I8042_COMMAND_PORT {
            if let Ok(mut d) = self.i8042.lock() {
                if d.pio_write(port, data) == I8042Action::Reset {
                    return BusAction::Reset;
                }
            }
        }
        BusAction::None
    }

    /// MMIO read; addresses without a device read as zero.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.find_mmio(addr) {
            Some((offset, t)) => {
                if let Ok(mut t) = t.lock() {
                    t.read(offset, data);
                }
            }
            None => data.fill(0),
        }
    }

    /// MMIO write; addresses without a device are ignored.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((offset, t)) = self.find_mmio(addr) {
            if let Ok(mut t) = t.lock() {
                t.write(offset, data);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn bus() -> DeviceBus {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        DeviceBus::new(SerialDevice::new(evt, Box::new(std::io::sink())))
    }

    #[test]
    fn unknown_ports_and_addresses() {
        let b = bus();
        let mut d = [0u8; 2];
        b.pio_read(0x80, &mut d);
        assert_eq!(d, [0xff, 0xff]);
        assert_eq!(b.pio_write(0x80, &[1]), BusAction::None);
        let mut m = [1u8; 4];
        b.mmio_read(0xd000_0000, &mut m);
        assert_eq!(m, [0; 4]);
        b.mmio_write(0xd000_0000, &[1, 2, 3, 4]);
    }

    #[test]
    fn keyboard_reset_stops_the_vm() {
        let b = bus();
        assert_eq!(b.pio_write(I8042_COMMAND_PORT, &[0xfe]), BusAction::Reset);
    }
}
