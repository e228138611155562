//! A minimal i8042 keyboard controller: just enough for the guest kernel's
//! `reboot=k` path, which waits for an empty input buffer and writes the
//! CPU-reset command 0xfe to port 0x64. vessel turns that into a clean VMM
//! exit (status 0).

/// Data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The pulse-reset-line command.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// What a port write asks of the VMM.
#[derive(Debug, PartialEq, Eq)]
pub enum I8042Action {
    /// Nothing.
    None,
    /// The guest asked for a CPU reset: end the VM.
    Reset,
}

/// The controller. It has no state: status reads say "buffers empty".
#[derive(Debug, Default)]
pub struct I8042Device;

impl I8042Device {
    /// Port read (status and data read as 0: nothing pending, buffers empty).
    pub fn pio_read(&mut self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }

    /// Port write.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> I8042Action {
        if port == I8042_COMMAND_PORT && data.first() == Some(&CMD_RESET_CPU) {
            I8042Action::Reset
        } else {
            I8042Action::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command() {
        let mut d = I8042Device;
        assert_eq!(d.pio_write(I8042_COMMAND_PORT, &[0xfe]), I8042Action::Reset);
        assert_eq!(d.pio_write(I8042_COMMAND_PORT, &[0xaa]), I8042Action::None);
        assert_eq!(d.pio_write(I8042_DATA_PORT, &[0xfe]), I8042Action::None);
        let mut st = [0xffu8];
        d.pio_read(I8042_COMMAND_PORT, &mut st);
        assert_eq!(st[0], 0);
    }
}
