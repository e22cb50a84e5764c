//! The one place that decides what an error means: retry it, isolate the row, or give up.
//!
//! Classification is by SQLSTATE (`tokio_postgres::Error::code`) and by whether the connection is
//! gone (`is_closed`, I/O errors carry no SQLSTATE). The categories are also the `error_type` values
//! rowsync writes to `sync_errors`.

use tokio_postgres::error::SqlState;

use super::Error;

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Likely to succeed if tried again after a pause: connection loss, deadlock, timeouts, overload.
    Retry,
    /// The target rejects this particular row (constraint, bad value, missing column): isolate it,
    /// record it, retry it on later sweeps, let every other row through.
    IsolateRow,
    /// Anything else: a bug or a misconfiguration that retrying will not fix.
    GiveUp,
}

/// The decision about one error: what to do, and how `sync_errors` records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Decision {
    pub(crate) action: Action,
    pub(crate) error_type: ErrorType,
}

impl Decision {
    const fn new(action: Action, error_type: ErrorType) -> Self {
        Self { action, error_type }
    }

    pub(crate) fn retry(self) -> bool {
        self.action == Action::Retry
    }

    /// The session is gone (or going): nothing more can be done in its transaction.
    pub(crate) fn connection_lost(self) -> bool {
        self == Self::new(Action::Retry, ErrorType::ConnectionError)
    }
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
    pub(crate) const ALL: [ErrorType; 8] = [
        Self::ConstraintViolation,
        Self::DataError,
        Self::SchemaMismatch,
        Self::ConnectionError,
        Self::RealtimeSyncConnectionError,
        Self::Timeout,
        Self::PermissionDenied,
        Self::SyncError,
    ];

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

/// The decision about any error of ours.
pub(crate) fn decide(error: &Error) -> Decision {
    match error {
        // The server did not answer in time: as good as a lost connection (it is given up).
        Error::Timeout { .. } => Decision::new(Action::Retry, ErrorType::ConnectionError),
        Error::Pool { .. } => Decision::new(Action::Retry, ErrorType::ConnectionError),
        Error::RowSecurity { .. } => Decision::new(Action::GiveUp, ErrorType::PermissionDenied),
        Error::Schema { .. } | Error::NotSetUp { .. } | Error::Config(_) => {
            Decision::new(Action::GiveUp, ErrorType::SchemaMismatch)
        }
        other => match other.postgres() {
            Some(driver) => decide_driver(driver),
            None => Decision::new(Action::GiveUp, ErrorType::SyncError),
        },
    }
}

/// The decision about a driver error: by SQLSTATE, or, without one, a broken connection.
pub(crate) fn decide_driver(error: &tokio_postgres::Error) -> Decision {
    if error.is_closed() {
        return Decision::new(Action::Retry, ErrorType::ConnectionError);
    }
    match error.code() {
        Some(code) => decide_sqlstate(code),
        // No SQLSTATE: the connection broke (I/O error, closed, or protocol trouble).
        None => Decision::new(Action::Retry, ErrorType::ConnectionError),
    }
}

/// The decision about a SQLSTATE.
pub(crate) fn decide_sqlstate(code: &SqlState) -> Decision {
    use Action::{GiveUp, IsolateRow, Retry};
    if [
        SqlState::QUERY_CANCELED,
        SqlState::LOCK_NOT_AVAILABLE,
        SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
    ]
    .contains(code)
    {
        return Decision::new(Retry, ErrorType::Timeout);
    }
    let code_str = code.code();
    let (action, error_type) = match &code_str[..2.min(code_str.len())] {
        // protocol_violation: the server refused what was sent (a message over its 1 GiB limit),
        // and would refuse the same batch again on every retry.
        "08" if code == &SqlState::PROTOCOL_VIOLATION => (GiveUp, ErrorType::SyncError),
        // connection_exception; admin/crash shutdown, cannot_connect_now (57P01..57P03)
        "08" | "57" => (Retry, ErrorType::ConnectionError),
        // insufficient_resources: too_many_connections, out of memory, disk full
        "53" => (Retry, ErrorType::ConnectionError),
        // transaction_rollback: serialization_failure, deadlock_detected
        "40" => (Retry, ErrorType::Timeout),
        // system error (I/O)
        "58" => (Retry, ErrorType::ConnectionError),
        // not_null_violation: the target wants a value the source has not got (a column the
        // source dropped or never had, or one the source lets be NULL): the schemas disagree.
        "23" if code == &SqlState::NOT_NULL_VIOLATION => (IsolateRow, ErrorType::SchemaMismatch),
        "23" => (IsolateRow, ErrorType::ConstraintViolation),
        // A value longer than the target's type allows (varchar(n), char(n), bit(n)): the target's
        // type is narrower than the source's.
        "22" if [
            SqlState::STRING_DATA_RIGHT_TRUNCATION,
            SqlState::STRING_DATA_LENGTH_MISMATCH,
        ]
        .contains(code) =>
        {
            (IsolateRow, ErrorType::SchemaMismatch)
        }
        "22" => (IsolateRow, ErrorType::DataError),
        "42" if code == &SqlState::INSUFFICIENT_PRIVILEGE => {
            (IsolateRow, ErrorType::PermissionDenied)
        }
        // syntax_error_or_access_rule_violation: undefined column or table, datatype mismatch
        "42" => (IsolateRow, ErrorType::SchemaMismatch),
        // a trigger or rule in the target raised an exception for this row
        "P0" | "44" | "27" => (IsolateRow, ErrorType::ConstraintViolation),
        // program_limit_exceeded: a value too large for an index entry or a row (the other 54xxx
        // are about the statement, and give up)
        "54" if code == &SqlState::PROGRAM_LIMIT_EXCEEDED => (IsolateRow, ErrorType::DataError),
        _ => (GiveUp, ErrorType::SyncError),
    };
    Decision::new(action, error_type)
}

/// Whether a call failed waiting for a lock (lock_timeout, or statement_timeout while waiting, or
/// our own bound on the call).
pub(crate) fn waited_for_a_lock(error: &Error) -> bool {
    match error {
        Error::Timeout { .. } => true,
        other => other.postgres().and_then(|e| e.code()).is_some_and(|code| {
            code == &SqlState::LOCK_NOT_AVAILABLE || code == &SqlState::QUERY_CANCELED
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify_code(code: &str) -> Decision {
        decide_sqlstate(&SqlState::from_code(code))
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
                Decision::new(Action::Retry, kind),
                "{code}"
            );
        }
    }

    #[test]
    fn rejected_rows_are_isolated() {
        for (code, kind) in [
            ("23505", ErrorType::ConstraintViolation), // unique_violation
            ("23502", ErrorType::SchemaMismatch),      // not_null_violation
            ("23514", ErrorType::ConstraintViolation), // check_violation
            ("23503", ErrorType::ConstraintViolation), // foreign_key_violation
            ("22001", ErrorType::SchemaMismatch),      // string_data_right_truncation
            ("22026", ErrorType::SchemaMismatch),      // string_data_length_mismatch
            ("22P02", ErrorType::DataError),           // invalid_text_representation
            ("22003", ErrorType::DataError),           // numeric_value_out_of_range
            ("42703", ErrorType::SchemaMismatch),      // undefined_column
            ("42804", ErrorType::SchemaMismatch),      // datatype_mismatch
            ("42501", ErrorType::PermissionDenied),    // insufficient_privilege
            ("P0001", ErrorType::ConstraintViolation), // raise_exception in a target trigger
            ("54000", ErrorType::DataError),           // index row size exceeds maximum
        ] {
            assert_eq!(
                classify_code(code),
                Decision::new(Action::IsolateRow, kind),
                "{code}"
            );
        }
    }

    #[test]
    fn unknown_failures_are_fatal() {
        assert_eq!(classify_code("XX000").action, Action::GiveUp); // internal_error
        assert_eq!(classify_code("0A000").action, Action::GiveUp); // feature_not_supported
        // The same batch would be refused again (a message over the server's 1 GiB limit).
        assert_eq!(classify_code("08P01").action, Action::GiveUp); // protocol_violation
        assert_eq!(classify_code("54001").action, Action::GiveUp); // statement_too_complex
    }
}
