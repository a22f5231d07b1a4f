//! `/user/configs`: per-user key/value settings (reference §1.2).

use crate::Api;

pub fn register(api: Api) -> Api {
    api
}
