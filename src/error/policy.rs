//! The one place that decides what an error means: retry it, isolate the row, or give up.
//!
//! Classification is by SQLSTATE (`tokio_postgres::Error::code`) and by whether the connection is
//! gone (`is_closed`, I/O errors carry no SQLSTATE). The categories are also the `error_type` values
//! rowsync writes to `sync_errors`.

use tokio_postgres::error::SqlState;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Likely to succeed if tried again after a pause: connection loss, deadlock, timeouts, overload.
    Transient,
    /// The target rejects this particular row (constraint, bad value, missing column): isolate it,
    /// record it, retry it on later sweeps, let every other row through.
    RowRejected,
    /// Anything else: a bug or a misconfiguration that retrying will not fix.
    Fatal,
}

/// `sync_errors.error_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorType {
    ConstraintViolation,
    DataError,
    SchemaMismatch,
    ConnectionError,
    RealtimeSyncConnectionError,
    Timeout,
    PermissionDenied,
    SyncError,
}

impl ErrorType {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::ConstraintViolation => "CONSTRAINT_VIOLATION",
            Self::DataError => "DATA_ERROR",
            Self::SchemaMismatch => "SCHEMA_MISMATCH",
            Self::ConnectionError => "CONNECTION_ERROR",
            Self::RealtimeSyncConnectionError => "REALTIME_SYNC_CONNECTION_ERROR",
            Self::Timeout => "TIMEOUT",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::SyncError => "SYNC_ERROR",
        }
    }
}

/// Classifies a driver error.
pub(crate) fn classify(error: &tokio_postgres::Error) -> (Disposition, ErrorType) {
    match error.code() {
        Some(code) => classify_sqlstate(code),
        // No SQLSTATE: the connection broke (I/O error, closed, or protocol trouble).
        None => (Disposition::Transient, ErrorType::ConnectionError),
    }
}

/// Classifies a SQLSTATE.
pub(crate) fn classify_sqlstate(code: &SqlState) -> (Disposition, ErrorType) {
    let code_str = code.code();
    let class = &code_str[..2.min(code_str.len())];
    if [
        SqlState::QUERY_CANCELED,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
    ]
    .contains(code)
    {
        return (Disposition::Transient, ErrorType::Timeout);
    }
    match class {
        // connection_exception; admin/crash shutdown, cannot_connect_now (57P01..57P03)
        "08" => (Disposition::Transient, ErrorType::ConnectionError),
        "57" => (Disposition::Transient, ErrorType::ConnectionError),
        // insufficient_resources: too_many_connections, out of memory, disk full
        "53" => (Disposition::Transient, ErrorType::ConnectionError),
        // transaction_rollback: serialization_failure, deadlock_detected
        "40" => (Disposition::Transient, ErrorType::Timeout),
        // system error (I/O)
        "58" => (Disposition::Transient, ErrorType::ConnectionError),
        "23" => (Disposition::RowRejected, ErrorType::ConstraintViolation),
        "22" => (Disposition::RowRejected, ErrorType::DataError),
        "42" if code == &SqlState::INSUFFICIENT_PRIVILEGE => {
            (Disposition::RowRejected, ErrorType::PermissionDenied)
        }
        // syntax_error_or_access_rule_violation: undefined column or table, datatype mismatch
        "42" => (Disposition::RowRejected, ErrorType::SchemaMismatch),
        // a trigger or rule in the target raised an exception for this row
        "P0" | "44" | "27" => (Disposition::RowRejected, ErrorType::ConstraintViolation),
        _ => (Disposition::Fatal, ErrorType::SyncError),
    }
}

/// Whether an error of ours, wherever it came from, is worth retrying.
pub(crate) fn is_transient(error: &crate::error::Error) -> bool {
    match error {
        crate::error::Error::Pool { .. } | crate::error::Error::Timeout { .. } => true,
        other => other
            .postgres()
            .is_some_and(|e| classify(e).0 == Disposition::Transient),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_code(code: &str) -> (Disposition, ErrorType) {
        classify_sqlstate(&SqlState::from_code(code))
    }

    #[test]
    fn transient_failures_are_retried() {
        for (code, kind) in [
            ("08006", ErrorType::ConnectionError), // connection_failure
            ("08001", ErrorType::ConnectionError), // sqlclient_unable_to_establish_sqlconnection
            ("57P01", ErrorType::ConnectionError), // admin_shutdown
            ("57P03", ErrorType::ConnectionError), // cannot_connect_now
            ("53300", ErrorType::ConnectionError), // too_many_connections
            ("40001", ErrorType::Timeout),         // serialization_failure
            ("40P01", ErrorType::Timeout),         // deadlock_detected
            ("55P03", ErrorType::Timeout),         // lock_not_available (lock_timeout)
            ("57014", ErrorType::Timeout),         // query_canceled (statement_timeout)
            ("25P03", ErrorType::Timeout),         // idle_in_transaction_session_timeout
        ] {
            assert_eq!(
                classify_code(code),
                (Disposition::Transient, kind),
                "{code}"
            );
        }
    }

    #[test]
    fn rejected_rows_are_isolated() {
        for (code, kind) in [
            ("23505", ErrorType::ConstraintViolation), // unique_violation
            ("23502", ErrorType::ConstraintViolation), // not_null_violation
            ("23514", ErrorType::ConstraintViolation), // check_violation
            ("23503", ErrorType::ConstraintViolation), // foreign_key_violation
            ("22001", ErrorType::DataError),           // string_data_right_truncation
            ("22P02", ErrorType::DataError),           // invalid_text_representation
            ("22003", ErrorType::DataError),           // numeric_value_out_of_range
            ("42703", ErrorType::SchemaMismatch),      // undefined_column
            ("42804", ErrorType::SchemaMismatch),      // datatype_mismatch
            ("42501", ErrorType::PermissionDenied),    // insufficient_privilege
            ("P0001", ErrorType::ConstraintViolation), // raise_exception in a target trigger
        ] {
            assert_eq!(
                classify_code(code),
                (Disposition::RowRejected, kind),
                "{code}"
            );
        }
    }

    #[test]
    fn unknown_failures_are_fatal() {
        assert_eq!(classify_code("XX000").0, Disposition::Fatal); // internal_error
        assert_eq!(classify_code("0A000").0, Disposition::Fatal); // feature_not_supported
    }
}
