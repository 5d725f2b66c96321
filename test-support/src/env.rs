//! The environment a test needs: present, or the test fails saying how to provide it.

/// The value of `name`; panics with a message naming the variable and the command that sets it
/// up when it is missing, so that a test needing PostgreSQL or Kafka fails instead of skipping.
#[track_caller]
pub fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value,
        _ => panic!("{name} is not set: run these tests with ./dev test (it provisions PostgreSQL and Kafka)"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "TASKSTREAM_SURELY_UNSET is not set: run these tests with ./dev test")]
    fn a_missing_variable_fails_with_the_command_to_fix_it() {
        super::required_env("TASKSTREAM_SURELY_UNSET");
    }
}
