//! Typed identifiers. Each is a UUID newtype so a task id can never be passed
//! where a step id is expected; all serialise as their hyphenated string form.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        #[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh, time-ordered (UUIDv7) id: new rows land at the right edge of the index.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }

        impl From<Uuid> for $name {
            fn from(u: Uuid) -> Self {
                Self(u)
            }
        }
    };
}

id_type!(
    /// An organisation: the unit of tenancy; every token, workstation and task belongs to one.
    OrgId
);
id_type!(
    /// A task: one unit of work with its intent, mode and targets.
    TaskId
);
id_type!(
    /// One execution of a task (materialised on planned → queued).
    ExecutionId
);
id_type!(
    /// One workstation's share of an execution; the unit a lease covers.
    StepId
);
id_type!(
    /// A registered workstation (the machine a worker runs on).
    WorkstationId
);
id_type!(
    /// A task schedule (cron expression, time zone and task template).
    ScheduleId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_strings_and_serde() {
        let id = TaskId::new();
        let parsed: TaskId = id.to_string().parse().unwrap();
        assert_eq!(id, parsed);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert!("not-a-uuid".parse::<TaskId>().is_err());
    }

    #[test]
    fn new_ids_are_time_ordered() {
        let a = StepId::new();
        let b = StepId::new();
        assert!(a < b);
    }
}
