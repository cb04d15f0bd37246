//! Phone numbers as billing systems and customers type them, normalised to E.164.
//!
//! Indonesian numbers may be written nationally (`0812-3456-7890`, `(0812) 3456-7890`), without
//! the trunk zero (`812...`), or with the country code with or without `+`. Any other country must
//! be written with `+` and its country code. Every number is checked against libphonenumber's
//! numbering plan, and Indonesian numbers must be mobile numbers: WhatsApp accounts live on mobile
//! numbers, and sending to a landline costs a Meta call that can only fail (131026).

use std::fmt;

/// A validated number in E.164 form, e.g. `+6281234567890`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Phone {
    e164: String,
    country_code: u16,
}

impl Phone {
    /// `+6281234567890`: what Meta's `to` field gets.
    pub fn e164(&self) -> &str {
        &self.e164
    }

    /// The digits without `+`: `6281234567890`. Used in store keys.
    pub fn digits(&self) -> &str {
        &self.e164[1..]
    }

    pub fn country_code(&self) -> u16 {
        self.country_code
    }
}

impl fmt::Debug for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.e164)
    }
}

impl fmt::Display for Phone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.e164)
    }
}

/// Why a phone number was refused; the text is safe to show to a developer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhoneError {
    #[error("phone number is empty")]
    Empty,
    #[error(
        "phone number may contain only digits, spaces, dashes, dots, parentheses and a leading +"
    )]
    BadCharacters,
    #[error("phone number has {0} digits; a full number has 8 to 15")]
    WrongLength(usize),
    #[error("not a valid phone number in the international numbering plan")]
    NotValid,
    #[error(
        "not an Indonesian mobile number (expected 08xx..., 8xx..., 628xx... or +628xx... with 9 to 12 digits after 62)"
    )]
    NotIndonesianMobile,
}

const INDONESIA: u16 = 62;

/// Parses what a person typed into a validated E.164 number.
pub fn normalize(input: &str) -> Result<Phone, PhoneError> {
    let trimmed = input.trim();
    if trimmed.is_empty() {
        return Err(PhoneError::Empty);
    }
    let mut digits = String::with_capacity(trimmed.len());
    let mut plus = false;
    for (i, c) in trimmed.char_indices() {
        match c {
            '0'..='9' => digits.push(c),
            '+' if i == 0 => plus = true,
            ' ' | '-' | '.' | '(' | ')' => {}
            _ => return Err(PhoneError::BadCharacters),
        }
    }
    if digits.is_empty() {
        return Err(PhoneError::Empty);
    }
    // Without `+`, a number is read as Indonesian: "08..." national with trunk zero,
    // "62..." international without the plus, "8..." national without the trunk zero.
    let international = if plus {
        digits
    } else if let Some(rest) = digits.strip_prefix('0') {
        format!("62{rest}")
    } else if digits.starts_with("62") {
        digits
    } else {
        format!("62{digits}")
    };
    // "+62 (0)812...": the trunk zero does not belong after the country code.
    let international = match international.strip_prefix("620") {
        Some(rest) => format!("62{rest}"),
        None => international,
    };
    if !(8..=15).contains(&international.len()) {
        return Err(PhoneError::WrongLength(international.len()));
    }
    if let Some(national) = international.strip_prefix("62") {
        // Almost every number kabar sees is Indonesian: check it against libphonenumber's own
        // Indonesian mobile pattern, compiled once. phonenumber's general path takes ~5 us and a
        // global lock per call, which showed up at the top of the VerifyOtp profile.
        return if INDONESIAN_MOBILE.is_match(national) {
            Ok(Phone {
                e164: format!("+{international}"),
                country_code: INDONESIA,
            })
        } else {
            Err(PhoneError::NotIndonesianMobile)
        };
    }
    let parsed =
        phonenumber::parse(None, format!("+{international}")).map_err(|_| PhoneError::NotValid)?;
    if !parsed.is_valid() {
        return Err(PhoneError::NotValid);
    }
    Ok(Phone {
        e164: parsed.format().mode(phonenumber::Mode::E164).to_string(),
        country_code: parsed.code().value(),
    })
}

/// libphonenumber's pattern and lengths for Indonesian mobile national numbers (`8[1-35-9]...`).
struct MobilePattern {
    pattern: regex::Regex,
    lengths: Vec<usize>,
}

impl MobilePattern {
    fn is_match(&self, national: &str) -> bool {
        national.starts_with('8')
            && (9..=12).contains(&national.len())
            && (self.lengths.is_empty() || self.lengths.contains(&national.len()))
            && self.pattern.is_match(national)
    }
}

static INDONESIAN_MOBILE: std::sync::LazyLock<MobilePattern> = std::sync::LazyLock::new(|| {
    let mobile = phonenumber::metadata::DATABASE
        .by_id("ID")
        .and_then(|m| m.descriptors().mobile())
        .expect("libphonenumber metadata describes Indonesian mobile numbers");
    let source = format!("^(?:{})$", mobile.national_number().as_str());
    MobilePattern {
        pattern: regex::Regex::new(&source).expect("libphonenumber patterns are valid regexes"),
        lengths: mobile
            .possible_length()
            .iter()
            .map(|&l| usize::from(l))
            .collect(),
    }
});

/// Loads libphonenumber's metadata and compiles its patterns now, at start-up, instead of inside
/// the first call (where, in a debug build, it takes longer than a short gRPC deadline).
pub fn warm_up() {
    std::sync::LazyLock::force(&INDONESIAN_MOBILE);
    let _ = normalize("+6281234567890");
    let _ = normalize("+16505551234");
}

#[cfg(test)]
mod tests {
    use super::{PhoneError, normalize};

    #[test]
    fn indonesian_numbers_as_people_type_them() {
        for typed in [
            "0812-3456-7890",
            "+62 812 3456 7890",
            "62812-3456-7890",
            "(0812) 3456 7890",
            "+62 (812) 3456-7890",
        ] {
            let phone = normalize(typed).unwrap_or_else(|e| panic!("{typed}: {e}"));
            assert_eq!(phone.e164(), "+6281234567890", "{typed}");
            assert_eq!(phone.digits(), "6281234567890");
            assert_eq!(phone.country_code(), 62);
        }
    }

    #[test]
    fn other_countries_need_their_code() {
        assert_eq!(
            normalize("+44 7911 123456").unwrap().e164(),
            "+447911123456"
        );
        assert_eq!(normalize("+44 7911 123456").unwrap().country_code(), 44);
    }

    #[test]
    fn landlines_and_nonsense_are_refused() {
        assert!(normalize("021-5550-1234").is_err(), "a Jakarta landline");
        assert_eq!(normalize(""), Err(PhoneError::Empty));
        assert!(normalize("0812-3456-78x0").is_err());
        assert!(normalize("+62 812").is_err());
    }
}
