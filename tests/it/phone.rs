//! Phone numbers as people type them, normalised to E.164 or refused.

use kabar::phone::{PhoneError, normalize};

#[test]
fn indonesian_formats_normalise_to_e164() {
    let cases = [
        ("0812-3456-7890", "+6281234567890"),
        ("0812 3456 7890", "+6281234567890"),
        ("+62 812 3456 7890", "+6281234567890"),
        ("+62-812-3456-7890", "+6281234567890"),
        ("6281234567890", "+6281234567890"),
        ("81234567890", "+6281234567890"),
        ("(0812) 3456-7890", "+6281234567890"),
        ("  0812.3456.7890  ", "+6281234567890"),
        ("08123456789", "+628123456789"),
        ("0857-1234-5678", "+6285712345678"),
        ("0896 1234 5678", "+6289612345678"),
        ("0881-2345-6789", "+6288123456789"),
        ("0838 1234 567", "+628381234567"),
        ("+62 (0)812-3456-7890", "+6281234567890"),
    ];
    for (input, expected) in cases {
        let phone = normalize(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(phone.e164(), expected, "input {input:?}");
        assert_eq!(phone.country_code(), 62);
    }
}

#[test]
fn other_countries_need_a_plus_and_country_code() {
    let cases = [
        ("+60 12-345 6789", "+60123456789", 60),
        ("+65 8123 4567", "+6581234567", 65),
        ("+1 650 555 1234", "+16505551234", 1),
        ("+44 7911 123456", "+447911123456", 44),
    ];
    for (input, expected, cc) in cases {
        let phone = normalize(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
        assert_eq!(phone.e164(), expected, "input {input:?}");
        assert_eq!(phone.country_code(), cc);
    }
    // Without "+", a Malaysian number is read as Indonesian and is not a valid one.
    assert!(normalize("60123456789").is_err());
}

#[test]
fn invalid_numbers_are_refused_with_a_reason() {
    let cases: [(&str, PhoneError); 11] = [
        ("", PhoneError::Empty),
        ("   ", PhoneError::Empty),
        ("0812345", PhoneError::NotIndonesianMobile),
        ("0812-3456-78a0", PhoneError::BadCharacters),
        ("abc", PhoneError::BadCharacters),
        ("0812+34567890", PhoneError::BadCharacters),
        ("021-555-1234", PhoneError::NotIndonesianMobile),
        ("0812345678901234", PhoneError::WrongLength(17)),
        ("+62 812", PhoneError::WrongLength(5)),
        ("0800-123-4567", PhoneError::NotIndonesianMobile),
        ("+999 1234 5678", PhoneError::NotValid),
    ];
    for (input, expected) in cases {
        assert_eq!(normalize(input), Err(expected), "input {input:?}");
    }
}

#[test]
fn debug_and_display_show_only_the_e164_form() {
    let phone = normalize("0812-3456-7890").unwrap();
    assert_eq!(format!("{phone}"), "+6281234567890");
    assert_eq!(format!("{phone:?}"), "+6281234567890");
    assert_eq!(phone.digits(), "6281234567890");
}

/// The fast path for Indonesian numbers agrees with phonenumber's full classification.
#[test]
fn indonesian_fast_path_agrees_with_libphonenumber() {
    let db = &*phonenumber::metadata::DATABASE;
    let mut checked = 0;
    for prefix in 800..900 {
        for extra in 6..=9 {
            let national = format!("{prefix}{}", "1234567890"[..extra].to_owned());
            let full = phonenumber::parse(None, format!("+62{national}")).unwrap();
            let library_says_mobile = full.is_valid()
                && matches!(
                    full.number_type(db),
                    phonenumber::Type::Mobile | phonenumber::Type::FixedLineOrMobile
                );
            let ours = normalize(&format!("0{national}"));
            assert_eq!(ours.is_ok(), library_says_mobile, "0{national}: {ours:?}");
            if let Ok(phone) = ours {
                assert_eq!(phone.e164(), format!("+62{national}"));
            }
            checked += 1;
        }
    }
    assert_eq!(checked, 400);
}
