use em_store::testing;

#[tokio::test]
async fn smoke_sqlite_and_postgres() {
    let s = testing::sqlite_store().await;
    assert_eq!(s.backend(), "sqlite");
    assert!(s.list_devices().await.expect("list").is_empty());
    if let Some(p) = testing::postgres_store().await {
        assert_eq!(p.backend(), "postgres");
        assert!(p.list_devices().await.expect("list").is_empty());
    }
}
