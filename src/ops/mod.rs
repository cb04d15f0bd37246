//! Operators' tools that talk to Meta's Graph API with kabar's configuration: the setup
//! checklist (`kabar doctor`), the templates at Meta (`kabar templates status|push`) with the
//! lint that keeps a template from being refused, and the connection status (`GET /status`).

pub mod doctor;
pub mod lint;
pub mod status;
pub mod templates;
