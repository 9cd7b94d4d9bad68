async def test_servers_start(time_skipping_env, dev_env, s3, settings):
    assert s3.list_objects_v2(Bucket=settings.bucket)["KeyCount"] == 0
    assert time_skipping_env.supports_time_skipping
    assert not dev_env.supports_time_skipping
