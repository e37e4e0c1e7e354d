"""The web console in a real browser (Debian's chromium) against two real appliances."""

from __future__ import annotations

import os
from pathlib import Path

from .conftest import Federation, sign_in

SHOTS = os.environ.get("ISTHMUS_CONSOLE_SCREENSHOTS")  # a folder: save the views there


async def test_sign_in_lists_both_clusters_and_the_services(
    federation: Federation, browser
) -> None:
    east = federation.east
    page = await sign_in(browser, east, east.token())
    await page.wait_for_selector("[data-testid=node-east][data-state=local]")
    await page.wait_for_selector("[data-testid=node-west][data-state=connected]")
    cards = page.locator("[data-testid=card-west]")
    await cards.get_by_text("reviews.default").wait_for()
    await page.locator("[data-testid=card-east]").get_by_text("reviews.default").wait_for()
    if SHOTS:
        await page.screenshot(path=str(Path(SHOTS) / "console-topology.png"), full_page=True)
    await page.click("nav a[data-view=services]")
    await page.click("[data-testid='service-reviews.default']")
    await page.wait_for_selector("[data-testid=endpoint-reviews-east]")
    await page.wait_for_selector("[data-testid=endpoint-cluster-west]")
    if SHOTS:
        await page.screenshot(path=str(Path(SHOTS) / "console-service.png"), full_page=True)
    assert page.errors == []
