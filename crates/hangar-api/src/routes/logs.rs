//! `/logs`, `/logs/stream`: the server's own log (reference §1.8).

use crate::Api;

pub fn register(api: Api) -> Api {
    api
}
