//! Parallels Desktop driver for Hangar.
