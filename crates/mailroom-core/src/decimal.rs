//! Decimal digits without `core::fmt`, for the text written for every
//! message: replies, trace-header dates, log timestamps.

/// A number's decimal digits, zero-padded, on the stack.
pub struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    /// `n` in decimal, zero-padded to at least `width` digits (at most 20,
    /// which every `u64` fits in).
    pub fn new(n: u64, width: usize) -> Self {
        let mut digits = [b'0'; 20];
        let mut start = digits.len();
        let mut n = n;
        while n > 0 || digits.len() - start < width.clamp(1, 20) {
            start -= 1;
            digits[start] = b'0' + (n % 10) as u8;
            n /= 10;
        }
        Decimal { digits, start }
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII digits are ever written.
        std::str::from_utf8(&self.digits[self.start..]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::Decimal;

    #[test]
    fn digits_and_padding() {
        assert_eq!(Decimal::new(0, 0).as_str(), "0");
        assert_eq!(Decimal::new(7, 2).as_str(), "07");
        assert_eq!(Decimal::new(451_568, 6).as_str(), "451568");
        assert_eq!(Decimal::new(42, 6).as_str(), "000042");
        assert_eq!(Decimal::new(123, 1).as_str(), "123");
        assert_eq!(Decimal::new(u64::MAX, 30).as_str(), u64::MAX.to_string());
    }
}
