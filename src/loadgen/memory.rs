//! The process's peak memory, from `/proc/self/status` (Linux; elsewhere, unknown).

/// The peak resident memory of the process so far (`VmHWM`), in MiB; `None` where it cannot
/// be read.
pub fn peak_mib() -> Option<f64> {
    status_kib("VmHWM:").map(|kib| kib as f64 / 1024.0)
}

/// The resident memory of the process now (`VmRSS`), in MiB.
pub fn resident_mib() -> Option<f64> {
    status_kib("VmRSS:").map(|kib| kib as f64 / 1024.0)
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_at_least_what_is_resident() {
        if let (Some(peak), Some(now)) = (peak_mib(), resident_mib()) {
            assert!(peak >= now * 0.5 && peak > 0.0);
        }
    }
}
