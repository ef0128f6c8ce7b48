use fastcdc::v2020::{
    AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
};

/// FastCDC size bounds in bytes. Recorded with each dataset so that every version of it cuts
/// at the same places.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Params {
    /// No cut before this many bytes (a file smaller than this is one chunk).
    pub min: u32,
    /// Target average chunk size.
    pub avg: u32,
    /// A cut is forced at this many bytes.
    pub max: u32,
}

impl Default for Params {
    /// 8 / 32 / 128 KiB: see `docs/chunking.md` for the measurement behind it.
    fn default() -> Self {
        Params {
            min: 8 << 10,
            avg: 32 << 10,
            max: 128 << 10,
        }
    }
}

/// Chunking bounds outside what FastCDC accepts, or not ordered min <= avg <= max.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid chunking parameters min={min} avg={avg} max={max}: {reason}")]
pub struct ParamsError {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
    pub reason: &'static str,
}

impl Params {
    /// Checked constructor.
    pub fn new(min: u32, avg: u32, max: u32) -> Result<Self, ParamsError> {
        let err = |reason| {
            Err(ParamsError {
                min,
                avg,
                max,
                reason,
            })
        };
        if !(MINIMUM_MIN..=MINIMUM_MAX).contains(&min) {
            return err("min must be between 64 B and 1 MiB");
        }
        if !(AVERAGE_MIN..=AVERAGE_MAX).contains(&avg) {
            return err("avg must be between 256 B and 4 MiB");
        }
        if !(MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max) {
            return err("max must be between 1 KiB and 16 MiB");
        }
        if !(min <= avg && avg <= max) {
            return err("need min <= avg <= max");
        }
        Ok(Params { min, avg, max })
    }

    /// Re-validates parameters read from an untrusted source.
    pub fn validate(self) -> Result<Self, ParamsError> {
        Params::new(self.min, self.avg, self.max)
    }
}
