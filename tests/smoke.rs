mod support;

#[tokio::test]
async fn get_through_tidegate() {
    let (b1, _) = support::backend("b1").await;
    let tg = support::tidegate(&support::simple_config(&[format!(r#"addr = "{b1}""#)], "")).await;
    assert_eq!(support::get(tg.addr, "/").await, (200, "hello from b1\n".to_string()));
    tg.stop().await;
}
