//! The harness itself: an environment dropped without `finish` (a test that
//! panicked) still removes its database, streams and Redis keys.

use tanjiren_tests::TestEnv;

#[tokio::test]
async fn a_dropped_environment_leaves_nothing_behind() {
    let env = TestEnv::new().await;
    let db_name = env.db_name.clone();
    let prefix = env.config.redis_key_prefix.clone();
    let mut redis = env.conns.redis();
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:lease:probe"))
        .arg("1")
        .query_async(&mut redis)
        .await
        .unwrap();
    let admin = sqlx::PgPool::connect(&env.config.database_url.replace(&db_name, "postgres"))
        .await
        .unwrap();
    let exists = || async {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&db_name)
            .fetch_one(&admin)
            .await
            .unwrap()
    };
    assert!(exists().await);
    drop(env);
    assert!(!exists().await, "the database outlived a dropped environment");
    let left: Option<String> = redis::cmd("GET")
        .arg(format!("{prefix}:lease:probe"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(left, None, "a Redis key outlived a dropped environment");
}
