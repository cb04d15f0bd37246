//! Why a call failed, as the machine-readable reasons clients see in `google.rpc.ErrorInfo`.
//! One enum instead of string literals: a reason is spelled once, and the set is known.

macro_rules! reasons {
    ($($(#[$doc:meta])* $variant:ident => $text:literal,)*) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Reason {
            $($(#[$doc])* $variant,)*
        }

        impl Reason {
            /// Every reason, for documentation checks and tests.
            pub const ALL: &[Reason] = &[$(Reason::$variant,)*];

            /// The reason as clients see it, e.g. `META_TEMPLATE_NOT_APPROVED`.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$variant => $text,)*
                }
            }
        }
    };
}

reasons! {
    MetaTokenInvalid => "META_TOKEN_INVALID",
    MetaPermissionDenied => "META_PERMISSION_DENIED",
    MetaAppRateLimit => "META_APP_RATE_LIMIT",
    MetaAccountRateLimit => "META_ACCOUNT_RATE_LIMIT",
    MetaThroughputExceeded => "META_THROUGHPUT_EXCEEDED",
    MetaPairRateLimit => "META_PAIR_RATE_LIMIT",
    MetaSpamRateLimit => "META_SPAM_RATE_LIMIT",
    MetaUserMarketingLimit => "META_USER_MARKETING_LIMIT",
    MetaInvalidParameter => "META_INVALID_PARAMETER",
    MetaParameterMissing => "META_PARAMETER_MISSING",
    MetaParameterInvalid => "META_PARAMETER_INVALID",
    MetaTemplateParamCountMismatch => "META_TEMPLATE_PARAM_COUNT_MISMATCH",
    MetaTemplateTextTooLong => "META_TEMPLATE_TEXT_TOO_LONG",
    MetaTemplatePolicyViolation => "META_TEMPLATE_POLICY_VIOLATION",
    MetaTemplateParamFormat => "META_TEMPLATE_PARAM_FORMAT",
    MetaTemplateParamInvalidText => "META_TEMPLATE_PARAM_INVALID_TEXT",
    MetaTemplateNotApproved => "META_TEMPLATE_NOT_APPROVED",
    MetaTemplatePaused => "META_TEMPLATE_PAUSED",
    MetaTemplateDisabled => "META_TEMPLATE_DISABLED",
    MetaPhoneNotRegistered => "META_PHONE_NOT_REGISTERED",
    MetaReengagementRequired => "META_REENGAGEMENT_REQUIRED",
    MetaRecipientUndeliverable => "META_RECIPIENT_UNDELIVERABLE",
    MetaAccountBlocked => "META_ACCOUNT_BLOCKED",
    MetaUnknownError => "META_UNKNOWN_ERROR",
    MetaServiceUnavailable => "META_SERVICE_UNAVAILABLE",
    MetaAccountMaintenance => "META_ACCOUNT_MAINTENANCE",
    MetaServerError => "META_SERVER_ERROR",
    MetaRateLimit => "META_RATE_LIMIT",
    MetaError => "META_ERROR",
    MetaUnreachable => "META_UNREACHABLE",
    MetaOutcomeUnknown => "META_OUTCOME_UNKNOWN",
    WhatsappDisabled => "WHATSAPP_DISABLED",
    OtpCountryNotAllowed => "OTP_COUNTRY_NOT_ALLOWED",
    OtpResendCooldown => "OTP_RESEND_COOLDOWN",
    OtpHourlyLimit => "OTP_HOURLY_LIMIT",
    OtpIpHourlyLimit => "OTP_IP_HOURLY_LIMIT",
    OtpDailyLimit => "OTP_DAILY_LIMIT",
    RateLimited => "RATE_LIMITED",
    PairRateLimited => "PAIR_RATE_LIMITED",
    DailyLimitReached => "DAILY_LIMIT_REACHED",
    StoreUnavailable => "STORE_UNAVAILABLE",
    IdempotencyKeyInFlight => "IDEMPOTENCY_KEY_IN_FLIGHT",
    IdempotencyKeyReused => "IDEMPOTENCY_KEY_REUSED",
    MessageNotFound => "MESSAGE_NOT_FOUND",
    CursorExpired => "CURSOR_EXPIRED",
    BatchNotFound => "BATCH_NOT_FOUND",
    BatchClosed => "BATCH_CLOSED",
    BatchSubmitBusy => "BATCH_SUBMIT_BUSY",
    ApiKeyMissing => "API_KEY_MISSING",
    ApiKeyInvalid => "API_KEY_INVALID",
    MissingScope => "MISSING_SCOPE",
    CallerQuota => "CALLER_QUOTA",
    SettingsRevisionMismatch => "SETTINGS_REVISION_MISMATCH",
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn reasons_are_distinct_screaming_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for reason in Reason::ALL {
            let text = reason.as_str();
            assert!(seen.insert(text), "{text} twice");
            assert!(
                text.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{text}"
            );
        }
    }
}
